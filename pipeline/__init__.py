"""Named end-to-end pipelines from pipelines.yaml: dataset, FAN-TL, label dump, students, evaluation, pictures."""
