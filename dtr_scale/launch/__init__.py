"""launch: submitit executors from the `cluster` config (dtr_scale.config.ClusterConfig),
preemptible self-requeueing training jobs, the job ledger, following and status.

    from dtr_scale.launch.submit import submit_training
    from dtr_scale.launch.ledger import read_status
"""
