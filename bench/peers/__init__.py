"""Side-by-side harness: this broker, RabbitMQ and NATS JetStream on one workload.

    python -m bench.peers [--messages N] [--runs 3] [--only broker,rabbitmq,nats] [--quick]

A producer sends N messages (~300-byte JSON body, priorities critical/high/normal/low, a TTL)
to one consumer that receives and acknowledges each; every send is confirmed only once durable
(as far as each system's settings make it so: see docs/performance.md). The same Python asyncio
clients on uvloop drive all three, back to back on this machine. A peer that does not answer is
skipped with a message. Not a test: nothing here can fail the test suite.
"""
