"""What two or more churnguard services share.

Event models, the topic registry, settings, Kafka and PostgreSQL plumbing, metrics and logs.
"""
