"""Evaluating a distilled set: the methods compared (`methods`), how a student trains and is tested (`student`,
`augment`), and what is written and reported (`results`). The `evaluate` and `report` stages drive it.
"""
