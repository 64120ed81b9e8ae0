"""Flags declared once (resflows/flags.py): the parsers, the resume rules and ModelConfig are derived from
the config fields, so these tests pin what the derivation must produce."""
import dataclasses

import pytest

from resflows.cli import ARCH_FLAGS, RUN_FLAGS, build_parser, parse_args
from resflows.config import ModelConfig, TrainConfig
from resflows.factory import model_config_from
from resflows.flags import option
from resflows.toy.cli import parse_args as parse_toy_args
from resflows.toy.config import ToyConfig


def test_explicit_flags_are_the_typed_ones():
    cfg, explicit = parse_args([])
    assert explicit == set() and cfg == TrainConfig()
    cfg, explicit = parse_args(["--lr", "1e-3", "--densenet_depth", "3", "--evaluate", "--resume", "c.pth", "--actnorm", "True",
                                "--save", "x"])
    # Typed with the default value still counts as typed (on --resume it overrides the checkpoint).
    assert explicit == {"lr", "densenet_depth", "evaluate", "resume", "actnorm", "save"}
    assert cfg == TrainConfig(evaluate=True, resume="c.pth", save="x")


def test_every_field_is_a_flag_with_its_spelling():
    options = {a.dest: a.option_strings for a in build_parser()._actions if a.dest != "help"}
    assert options == {f.name: [option(f)] for f in dataclasses.fields(TrainConfig)}
    assert options["densenet_depth"] == ["--densenet_depth"] and options["n_power_series"] == ["--n-power-series"]


def test_resume_rules():
    """Architecture flags come from the checkpoint; flags of this machine / invocation from the command line."""
    assert set(ARCH_FLAGS) == {
        "data", "imagesize", "padding", "squeeze_first", "block", "idim", "nblocks", "factor_out", "quadratic",
        "actnorm", "fc_actnorm", "batchnorm", "fc", "vnorms", "learn_p", "act", "kernels", "fc_end",
        "fc_idim", "preact", "first_resblock", "cdim", "task", "logit_transform", "nbits",
        "densenet", "densenet_depth", "densenet_growth", "fc_densenet_growth", "learnable_concat", "monotone_resolvent",
        "var_deq", "var_deq_nblocks", "var_deq_act", "var_deq_mf", "var_deq_cond_width", "var_deq_cond_hidden",
    }
    assert set(RUN_FLAGS) == {"resume", "dataroot", "nworkers", "device", "tf32", "evaluate", "sample", "temp", "nrow",
                              "max_iters", "save", "inverse", "eval_dequant_samples"}
    assert set(ModelConfig.ARCH_FIELDS) == {
        "input_size", "nblocks", "block", "idim", "squeeze_first", "factor_out", "quadratic", "init_layer",
        "actnorm", "fc_actnorm", "batchnorm", "fc", "vnorms", "learn_p", "act", "kernels",
        "fc_end", "fc_nblocks", "fc_idim", "preact", "first_resblock", "classification", "n_classes", "cdim",
        "densenet", "densenet_depth", "densenet_growth", "fc_densenet_growth", "learnable_concat", "monotone_resolvent",
        "var_deq", "var_deq_nblocks", "var_deq_act", "var_deq_mf", "var_deq_cond_width", "var_deq_cond_hidden",
    }


def test_model_config_takes_every_shared_field():
    """A model setting added to ModelConfig and TrainConfig reaches the model without a mapping to update."""
    shared = {f.name for f in dataclasses.fields(ModelConfig)} & {f.name for f in dataclasses.fields(TrainConfig)}
    assert len(shared) == 36 + 6  # all the fields model_config_from used to list one by one, monotone_resolvent, the --var-deq ones
    changed = dict(idim=16, coeff=0.5, n_samples=3, sn_tol=0.01, lip_coeff=0.9, mem_eff=False, densenet_growth=8,
                   nblocks="1-2", kernels="3-3", vnorms="2f2")
    m = model_config_from(TrainConfig(data="digits", **changed))
    got = (m.idim, m.coeff, m.n_samples, m.sn_tol, m.lip_coeff, m.mem_eff, m.densenet_growth)
    assert got == (16, 0.5, 3, 0.01, 0.9, False, 8)
    vd = model_config_from(TrainConfig(data="digits", nblocks="1-2", var_deq=True, var_deq_nblocks=3, var_deq_cond_hidden=64))
    assert (vd.var_deq, vd.var_deq_nblocks, vd.var_deq_cond_hidden) == (True, 3, 64)
    assert (m.nblocks, m.kernels, m.vnorms) == ((1, 2), (3, 3), (2.0, float("inf"), 2.0))


def test_old_checkpoint_keys_are_ignored():
    """Configs written by other versions hold keys that are not fields (an unknown one here): they still load."""
    d = dict(TrainConfig().to_dict(), no_such_setting=False)
    assert TrainConfig.from_dict(d) == TrainConfig()


def test_toy_flags_keep_the_papers_underscores():
    cfg = parse_toy_args(["--batch_size", "7", "--viz_freq", "3", "--n-power-series", "None", "--dims", "8-8"])
    assert (cfg.batch_size, cfg.viz_freq, cfg.n_power_series, cfg.dims) == (7, 3, None, (8, 8))
    assert parse_toy_args([]) == ToyConfig()
    with pytest.raises(SystemExit):
        parse_toy_args(["--batch-size", "7"])


def test_the_command_lines_act_choices_come_from_the_registry():
    import dataclasses

    from resflows.config import ModelConfig
    from resflows.flags import flag_spec
    from resflows.layers.activations import ACTIVATION_SCRIPTS, ACTIVATIONS
    from resflows.toy.config import ToyConfig

    assert set(ACTIVATION_SCRIPTS) <= set(ACTIVATIONS)
    for cls, script in ((ModelConfig, "img"), (ToyConfig, "toy")):
        act = next(f for f in dataclasses.fields(cls) if f.name == "act")
        assert set(flag_spec(act).choices) == {n for n, s in ACTIVATION_SCRIPTS.items() if script in s}
