"""Images (ImageFolder trees, tar archives, the embedded digits) -> VAE-latent shards (MDS or webdataset).

    dtr-prep images SRC OUT [--part i --num-parts n]   # one part; a SLURM array job sets the part itself
    dtr-prep merge OUT                                 # after all parts: index, report, manifest
    dtr-prep digits OUT                                # the embedded dataset, prepared and merged

Modules: sources (listings), images (decode, convert, crop), autoencoders (SD VAE, pixel), writers
(shards), layout (output directory), prepare (encode a part), merge, digits, cli.
"""
