"""launch: submitit executors from cluster presets, preemptible self-requeueing training jobs, job ledger.

    from dtr_scale.launch.config import ClusterConfig
    from dtr_scale.launch.submit import submit_training
    from dtr_scale.launch.ledger import read_status

Nothing is imported here, so dtr_scale.config can import ClusterConfig without a cycle.
"""
