"""The agent service: draft, feedback and revise for any agent of any world, with memory retrieval.

Stateless apart from caches: world specs come from the ``SANDBOX_WORLDS`` bucket and agent
memories from the ``SANDBOX_MEMORY`` stream, so any replica in the ``agent`` queue group can
serve any agent.
"""
