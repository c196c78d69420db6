"""Placement on a ('data', 'fsdp', 'tensor') mesh: the sharding rules table, `constrain`, HLO statistics.

It knows no model and no LoRA: families and methods add their rules to the table.
"""
