-- Registry table: the timeline of each participant, one row per subject x visit in visit order
-- (screening excluded): the visit date and out-of-window flag, consensus MASI / mMASI with
-- status and method, improvement, PGA with the MASI-implied grade, satisfaction, and the number
-- of adverse events recorded at the visit.
WITH subject_arm AS (
    SELECT s.patient_key, s.status AS subject_status, a.arm
    FROM subjects s LEFT JOIN arms a ON a.arm_name = s.arm_name
),
score AS (
    SELECT encounter_key, score, value, status, method, needs_adjudication FROM masi_consensus
),
ae_count AS (
    SELECT encounter_key, count(*) AS adverse_events_recorded
    FROM adverse_events WHERE encounter_key IS NOT NULL GROUP BY ALL
)
SELECT p.subject_id, sa.arm, sa.subject_status, sv.visit, v.visit_on, v.out_of_window,
    m.value AS masi, m.status AS masi_status, m.method AS masi_method,
    m.needs_adjudication, mm.value AS mmasi,
    i.improvement_pct, i.status AS improvement_status,
    pg.pga, CAST(replace(pg.pga_from_masi_code, 'pga-', '') AS INTEGER) AS pga_from_masi,
    pg.discordant AS pga_discordant,
    s.level AS satisfaction,
    coalesce(ae.adverse_events_recorded, 0) AS adverse_events_recorded
FROM visits v
JOIN study_visits sv ON sv.visit_code = v.visit_code
JOIN patients p ON p.patient_key = v.patient_key
LEFT JOIN subject_arm sa ON sa.patient_key = v.patient_key
LEFT JOIN score m ON m.encounter_key = v.encounter_key AND m.score = 'masi'
LEFT JOIN score mm ON mm.encounter_key = v.encounter_key AND mm.score = 'mmasi'
LEFT JOIN masi_improvement i ON i.encounter_key = v.encounter_key
LEFT JOIN pga pg ON pg.encounter_key = v.encounter_key
LEFT JOIN satisfaction s ON s.encounter_key = v.encounter_key
LEFT JOIN ae_count ae ON ae.encounter_key = v.encounter_key
ORDER BY p.subject_id, sv.visit_order
