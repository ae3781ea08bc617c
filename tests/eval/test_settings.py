"""One evaluation's identity: the result key tells the protocols apart, the samples folder does not."""

from pathlib import Path

from dtr_scale.eval.settings import EvalSettings

PAPER = dict(sampler="ddpm", sampling_steps=250, cfg_scale=1.5, guided_channels="all", ddim_eta=0.0,
             num_samples=50000, labels="random", seed=0, reference="x.npz", chunk_size=125)


def test_the_protocol_decides_the_result_not_the_samples_folder():
    full, quick = EvalSettings(**PAPER), EvalSettings(**PAPER, protocol="quick")
    assert full.result_key(400_000, "ema") != quick.result_key(400_000, "ema")
    assert full.result_key(400_000, "ema")[-1] == "full"
    # the same images under either protocol, in the folder the tree before protocols named (its hash)
    expected = Path("/r/eval/samples/step_00400000-ema-ddpm250-cfg1.5-5bdabd49")
    assert full.samples_folder("/r", 400_000, "ema") == quick.samples_folder("/r", 400_000, "ema") == expected
