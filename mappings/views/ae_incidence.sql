-- Registry table: adverse-event incidence per arm x term (SPEC §4, §9).
-- term is the protocol's term (the SPEC §3 token: erythema, ..., other) that every event carries
-- in the trial code system; events written without that coding (an earlier adapter) fall back to
-- the term whose display is the event's text, else other. term_display comes from
-- mappings/adverse_events.yaml (never the event's text: in the hospital target that is free text).
-- Participants in an arm are the enrolled participants of that arm (mappings/study.yaml arms,
-- by ResearchSubject.assignedArm), withdrawn ones included; screen failures never count, nor
-- do their events. participants = participants with >= 1 event of the term; incidence_pct =
-- participants / participants_in_arm x 100 (1 decimal, half away from zero); max_grade = the
-- highest CTCAE grade of the term's events; grade_k = participants whose highest grade of the
-- term is k.
WITH subject_arm AS (
    SELECT s.patient_key, a.arm, a.arm_name, a.arm_order
    FROM subjects s JOIN arms a ON a.arm_name = s.arm_name
    WHERE s.enrolled
),
arm_size AS (
    SELECT arm, count(*) AS participants_in_arm FROM subject_arm GROUP BY arm
),
events AS (
    SELECT sa.arm, sa.arm_name, sa.arm_order,
        coalesce(e.term, shown.term, 'other') AS term, e.snomed_code, e.meddra_code,
        e.patient_key, CAST(e.grade AS INTEGER) AS grade, e.serious
    FROM adverse_events e JOIN subject_arm sa USING (patient_key)
    LEFT JOIN ae_terms shown ON e.term IS NULL AND shown.term_display = e.term_text
),
per_participant AS (
    SELECT arm, term, patient_key, max(grade) AS max_grade FROM events GROUP BY ALL
),
by_grade AS (
    SELECT arm, term,
        count(*) FILTER (WHERE max_grade = 1) AS grade_1,
        count(*) FILTER (WHERE max_grade = 2) AS grade_2,
        count(*) FILTER (WHERE max_grade = 3) AS grade_3,
        count(*) FILTER (WHERE max_grade = 4) AS grade_4,
        count(*) FILTER (WHERE max_grade = 5) AS grade_5
    FROM per_participant GROUP BY ALL
)
SELECT e.arm, any_value(e.arm_name) AS arm_name, e.term, any_value(t.term_display) AS term_display,
    any_value(e.snomed_code) AS snomed_code, any_value(e.meddra_code) AS meddra_code,
    count(*) AS events,
    count(DISTINCT e.patient_key) AS participants,
    any_value(s.participants_in_arm) AS participants_in_arm,
    CAST(round(count(DISTINCT e.patient_key) * 1000 / any_value(s.participants_in_arm)) / 10
        AS DECIMAL(18, 1)) AS incidence_pct,
    max(e.grade) AS max_grade,
    any_value(g.grade_1) AS grade_1, any_value(g.grade_2) AS grade_2,
    any_value(g.grade_3) AS grade_3, any_value(g.grade_4) AS grade_4,
    any_value(g.grade_5) AS grade_5,
    count(*) FILTER (WHERE e.serious) AS serious_events
FROM events e JOIN arm_size s USING (arm) JOIN by_grade g USING (arm, term)
LEFT JOIN ae_terms t USING (term)
GROUP BY e.arm, e.term
ORDER BY any_value(e.arm_order), any_value(t.term_order), e.term
