-- Registry table: outcomes per arm x visit (SPEC §9), over the trial's view tables.
-- Arms come from mappings/study.yaml (table arms: ResearchSubject.assignedArm holds the arm's
-- name); arm 'all' counts every participant, enrolled in an arm or not.
-- Consensus MASI / mMASI: n, mean and median of the final values only; preliminary ones (one
-- rater, or two raters awaiting adjudication) are counted separately. Improvement likewise.
-- Means are rounded half away from zero (MASI to 2 decimals, improvement to 1 decimal, as the
-- FHIR values are), rates to 1 decimal; the *10^k / n form keeps the rounding exact.
WITH grp AS (
    SELECT s.patient_key, a.arm
    FROM subjects s JOIN arms a ON a.arm_name = s.arm_name
    UNION ALL
    SELECT patient_key, 'all' FROM patients
),
visit_of AS (
    SELECT v.encounter_key, sv.visit
    FROM visits v JOIN study_visits sv ON sv.visit_code = v.visit_code
),
masi AS (
    SELECT g.arm, vo.visit,
        count(*) FILTER (WHERE c.status = 'final') AS n,
        count(*) FILTER (WHERE c.status <> 'final') AS masi_preliminary_n,
        CAST(round(sum(c.value) FILTER (WHERE c.status = 'final') * 100
             / count(*) FILTER (WHERE c.status = 'final')) / 100 AS DECIMAL(18, 2)) AS masi_mean,
        round(median(c.value) FILTER (WHERE c.status = 'final'), 2) AS masi_median
    FROM masi_consensus c JOIN visit_of vo USING (encounter_key) JOIN grp g USING (patient_key)
    WHERE c.score = 'masi'
    GROUP BY ALL
),
mmasi AS (
    SELECT g.arm, vo.visit,
        count(*) FILTER (WHERE c.status = 'final') AS mmasi_n,
        CAST(round(sum(c.value) FILTER (WHERE c.status = 'final') * 100
             / count(*) FILTER (WHERE c.status = 'final')) / 100 AS DECIMAL(18, 2)) AS mmasi_mean,
        round(median(c.value) FILTER (WHERE c.status = 'final'), 2) AS mmasi_median
    FROM masi_consensus c JOIN visit_of vo USING (encounter_key) JOIN grp g USING (patient_key)
    WHERE c.score = 'mmasi'
    GROUP BY ALL
),
improvement AS (
    SELECT g.arm, vo.visit,
        count(*) FILTER (WHERE i.status = 'final') AS improvement_n,
        count(*) FILTER (WHERE i.status <> 'final') AS improvement_preliminary_n,
        CAST(round(sum(i.improvement_pct) FILTER (WHERE i.status = 'final') * 100
             / count(*) FILTER (WHERE i.status = 'final')) / 100 AS DECIMAL(18, 2))
            AS improvement_mean_pct
    FROM masi_improvement i JOIN visit_of vo USING (encounter_key) JOIN grp g USING (patient_key)
    GROUP BY ALL
),
pga_grades AS (
    SELECT g.arm, vo.visit,
        count(*) AS pga_n,
        count(*) FILTER (WHERE p.pga = 0) AS pga_0,
        count(*) FILTER (WHERE p.pga = 1) AS pga_1,
        count(*) FILTER (WHERE p.pga = 2) AS pga_2,
        count(*) FILTER (WHERE p.pga = 3) AS pga_3,
        count(*) FILTER (WHERE p.pga = 4) AS pga_4,
        count(*) FILTER (WHERE p.pga = 5) AS pga_5,
        count(*) FILTER (WHERE p.pga = 6) AS pga_6
    FROM pga p JOIN visit_of vo USING (encounter_key) JOIN grp g USING (patient_key)
    GROUP BY ALL
),
satisfied AS (
    SELECT g.arm, vo.visit,
        count(*) FILTER (WHERE s.level IN ('very_satisfied', 'satisfied'))
            AS satisfaction_numerator,
        count(*) AS satisfaction_denominator
    FROM satisfaction s JOIN visit_of vo USING (encounter_key) JOIN grp g USING (patient_key)
    GROUP BY ALL
),
grid AS (
    SELECT a.arm, a.arm_name, a.arm_order, sv.visit, sv.visit_order
    FROM (SELECT arm, arm_name, arm_order FROM arms
          UNION ALL SELECT 'all', 'All participants', 1000) a
    CROSS JOIN study_visits sv
)
SELECT grid.arm, grid.arm_name, grid.visit,
    coalesce(masi.n, 0) AS n,
    coalesce(masi.masi_preliminary_n, 0) AS masi_preliminary_n,
    masi.masi_mean, masi.masi_median,
    coalesce(mmasi.mmasi_n, 0) AS mmasi_n, mmasi.mmasi_mean, mmasi.mmasi_median,
    coalesce(improvement.improvement_n, 0) AS improvement_n,
    coalesce(improvement.improvement_preliminary_n, 0) AS improvement_preliminary_n,
    improvement.improvement_mean_pct,
    coalesce(pga_grades.pga_n, 0) AS pga_n,
    coalesce(pga_0, 0) AS pga_0, coalesce(pga_1, 0) AS pga_1, coalesce(pga_2, 0) AS pga_2,
    coalesce(pga_3, 0) AS pga_3, coalesce(pga_4, 0) AS pga_4, coalesce(pga_5, 0) AS pga_5,
    coalesce(pga_6, 0) AS pga_6,
    coalesce(satisfaction_numerator, 0) AS satisfaction_numerator,
    coalesce(satisfaction_denominator, 0) AS satisfaction_denominator,
    CAST(round(satisfaction_numerator * 1000 / satisfaction_denominator) / 10 AS DECIMAL(18, 1))
        AS satisfaction_rate_pct
FROM grid
LEFT JOIN masi USING (arm, visit)
LEFT JOIN mmasi USING (arm, visit)
LEFT JOIN improvement USING (arm, visit)
LEFT JOIN pga_grades USING (arm, visit)
LEFT JOIN satisfied USING (arm, visit)
ORDER BY grid.arm_order, grid.visit_order
