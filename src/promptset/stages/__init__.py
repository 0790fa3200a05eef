"""The stages, one module each, each one `<Verb>Config` dataclass and one verb: `select`, `invert`, `generate`,
`export`, `budget`, `evaluate`, `report`, `pretrain`. A stage never imports another stage; what two stages share
lives in the rooms below them (backends, evaluation, models, runfolder, ...). `promptset.pipeline` chains them.
"""
