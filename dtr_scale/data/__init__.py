"""Training data: latent shards prepared by `data_prep`, read as per-rank batches of fresh latents.

    loader.py        build_shard_loader / ShardLoader: the trainer's endless, resumable batch iterator
    order.py         which samples each rank reads at each step (seed, epoch, global batch)
    latents.py       z = scale * (mean + std * eps) on the image or its flip, drawn per (seed, epoch, sample)
    readers.py       random access to MDS and webdataset shards
    shard_format.py  the on-disk layout shared with data_prep, and read_manifest
    digits.py        the embedded scikit-learn digits as images; synthetic.py: toy latents with a known answer
"""
