-- Registry table: the data-quality flags (warnings, never rejections: the values stay in every
-- table), one row per flag, in this order:
--   awaiting-adjudication  consensus MASI of two raters who differ by more than the adjudication
--                          threshold: preliminary until a third physician rates (SPEC §4);
--   pga-masi-discordant    the physician's PGA differs by >= 2 grades from the grade implied by
--                          the MASI improvement (SPEC §4);
--   out-of-window          a visit assessed outside its window (SPEC §2; window_from_day ..
--                          window_to_day after the first treatment).
WITH subject_arm AS (
    SELECT s.patient_key, a.arm FROM subjects s LEFT JOIN arms a ON a.arm_name = s.arm_name
),
visit_of AS (
    SELECT v.encounter_key, v.visit_on, sv.visit, sv.visit_label, sv.visit_order,
        sv.window_from_day, sv.window_to_day
    FROM visits v JOIN study_visits sv ON sv.visit_code = v.visit_code
),
rater_values AS (
    SELECT r.encounter_key,
        string_agg(coalesce(ra.rater_id, '?') || ' ' || CAST(CAST(r.masi AS DECIMAL(18, 2)) AS VARCHAR),
            ' / ' ORDER BY ra.rater_id) AS raters
    FROM masi_ratings r LEFT JOIN raters ra USING (rater_key)
    GROUP BY r.encounter_key
),
flags AS (
    SELECT 1 AS flag_order, 'awaiting-adjudication' AS flag, c.patient_key, c.encounter_key,
        'consensus MASI ' || CAST(CAST(c.value AS DECIMAL(18, 2)) AS VARCHAR)
            || ' (preliminary); raters ' || coalesce(rv.raters, '?') AS detail
    FROM masi_consensus c LEFT JOIN rater_values rv USING (encounter_key)
    WHERE c.score = 'masi' AND c.needs_adjudication
    UNION ALL
    SELECT 2, 'pga-masi-discordant', p.patient_key, p.encounter_key,
        'PGA ' || CAST(p.pga AS VARCHAR) || ', implied by the MASI improvement '
            || coalesce(replace(p.pga_from_masi_code, 'pga-', ''), '?')
    FROM pga p WHERE p.discordant
    UNION ALL
    SELECT 3, 'out-of-window', v.patient_key, v.encounter_key,
        vo.visit_label || ' on ' || coalesce(v.visit_on, '?') || ': outside days '
            || CAST(vo.window_from_day AS VARCHAR) || ' to ' || CAST(vo.window_to_day AS VARCHAR)
            || ' after the first treatment'
    FROM visits v JOIN visit_of vo USING (encounter_key)
    WHERE v.out_of_window
)
SELECT f.flag, pt.subject_id, sa.arm, vo.visit, vo.visit_on, f.detail
FROM flags f
JOIN patients pt ON pt.patient_key = f.patient_key
LEFT JOIN subject_arm sa ON sa.patient_key = f.patient_key
LEFT JOIN visit_of vo ON vo.encounter_key = f.encounter_key
ORDER BY f.flag_order, pt.subject_id, vo.visit_order
