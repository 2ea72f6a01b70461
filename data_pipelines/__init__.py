"""qwenimg-train's data package: renderers, ingestion, shards and the sample schema.

`data_pipelines.core.schema` is the contract every writer and reader shares; the
`qwenimg-data` console script (`data_pipelines.cli`) runs the jobs.
"""
