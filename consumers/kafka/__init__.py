"""The Kafka adapters: the embedded broker, the message source, the snapshot and
dead-letter sinks, record and replay, and consumer groups.
"""
