-- Registry table: spread of the final consensus MASI per arm x visit, for confidence intervals
-- (the report's MASI plot): n, mean and sample standard deviation (sd is NULL below 2 values).
-- The exact, rounded mean and median are in outcomes_by_arm_visit; sd is double precision, for
-- intervals only. Every arm x visit of mappings/study.yaml has a row.
WITH visit_of AS (
    SELECT v.encounter_key, sv.visit
    FROM visits v JOIN study_visits sv ON sv.visit_code = v.visit_code
),
final AS (
    SELECT a.arm, vo.visit, c.value
    FROM masi_consensus c
    JOIN visit_of vo USING (encounter_key)
    JOIN subjects s USING (patient_key)
    JOIN arms a ON a.arm_name = s.arm_name
    WHERE c.score = 'masi' AND c.status = 'final'
)
SELECT a.arm, a.arm_name, sv.visit, sv.visit_label,
    count(f.value) AS n,
    CAST(round(sum(f.value) * 100 / count(f.value)) / 100 AS DECIMAL(18, 2)) AS masi_mean,
    stddev_samp(CAST(f.value AS DOUBLE)) AS masi_sd
FROM arms a CROSS JOIN study_visits sv
LEFT JOIN final f ON f.arm = a.arm AND f.visit = sv.visit
GROUP BY a.arm, a.arm_name, a.arm_order, sv.visit, sv.visit_label, sv.visit_order
ORDER BY a.arm_order, sv.visit_order
