"""launch: submitit executors from the `cluster` config (dtr_scale.config.ClusterConfig),
preemptible self-requeueing training jobs, the job ledger, following a job, and training
as one rank of a world torchrun or srun started. It runs the trainer it is given and
imports nothing of evaluation (dtr_scale.run hands the evaluator's hook to the trainer).

    from dtr_scale.launch.submit import submit_training
    from dtr_scale.launch.ledger import read_status
"""
