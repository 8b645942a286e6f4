"""Measuring and shipping a student: FID, the teacher-feature distance, reference statistics, export."""
