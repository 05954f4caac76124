-- Registry table: participants per arm (SPEC §4), the denominators of the report.
-- participants = those enrolled in the arm (ResearchSubject.assignedArm holds the arm's name),
-- withdrawn ones included; screen failures never count. withdrawn and completed (R4 status
-- off-study) are among them. Every arm of mappings/study.yaml has a row.
SELECT a.arm, a.arm_name,
    count(s.patient_key) AS participants,
    count(s.patient_key) FILTER (WHERE s.status = 'withdrawn') AS withdrawn,
    count(s.patient_key) FILTER (WHERE s.status = 'off-study') AS completed
FROM arms a LEFT JOIN subjects s ON s.arm_name = a.arm_name AND s.enrolled
GROUP BY a.arm, a.arm_name, a.arm_order
ORDER BY a.arm_order
