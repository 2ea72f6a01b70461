"""qwenimg-train: the trainer package (model, objective, curriculum, Lightning glue).

The data side lives in `data_pipelines`; this package may import its sample schema
and readers (DESIGN.md, "Layout"). The trainer modules land with the issues that
build them.
"""
