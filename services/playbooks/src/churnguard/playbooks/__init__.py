"""Playbooks: turn signals into decisions, and decisions into commands.

Declarative YAML playbooks say what to do about each signal; guard rails (cool-downs, a
contact budget per account, quiet hours, suppression while dunning, holdouts) say when
not to. Every evaluation is a row in the decision log; every action a command on Kafka
whose id derives from the decision, so a redelivered signal yields the same key.
"""
