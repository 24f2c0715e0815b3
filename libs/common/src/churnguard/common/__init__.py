"""What two or more churnguard services share: event models, topic registry, settings, Kafka and PostgreSQL plumbing, metrics and logs."""
