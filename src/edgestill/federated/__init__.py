"""Federated bidirectional distillation (LBKD's setting, [2] in docs/references.md), run on Flower.

N clients keep their labelled data; they and the server exchange only predictions (logits) on a public, unlabelled
transfer set, never weights. Each round every client trains on its own data and learns from the server's logits, the
server distils itself from the clients' aggregated logits (aggregate.py: mean, median, trimmed mean, agreement), and
the rounds run on Flower's simulation engine (flower.py). The job (`edgestill federate`, jobs/federate.py) plants a
trigger in some clients' data to measure whether the backdoor reaches the server and the honest clients.
"""
