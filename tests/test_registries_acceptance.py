"""Issue 9's acceptance: a choice registered in one place is seen everywhere, with no other module edited.

The test registers a throwaway init strategy, KD loss, sharing mode and architecture entry (removed
again afterwards) and checks that config validation (RecursiveConfig, the converter's ConvertSpec, the
training ModelConfig/KDConfig), `rrt convert --help`, the unknown-name errors, and the converter,
model and serving runner themselves all take them.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config, T5Config

from rrt_ray.cli import main
from rrt_ray.convert import ConvertSpec, convert_checkpoint
from rrt_ray.convert.init_strategies import INIT_STRATEGIES, SharedGroup
from rrt_ray.models.arch import ARCHITECTURES, ArchSpec, check_supported
from rrt_ray.models.layer_map import SHARING_MODES, SharingMode, tied_layers
from rrt_ray.train.config import KDConfig, ModelConfig
from rrt_ray.train.losses import KD_LOSSES, kd_divergence


def upper(group: SharedGroup) -> list[int]:
    """The LAST K layers of the looped block (the mirror image of `lower`)."""
    num_shared = len(group.block) // group.num_loops
    return [group.block[len(group.block) - num_shared + group.index]]


def total_variation(log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    return 0.5 * (log_s.exp() - log_t.exp()).abs().sum(-1)


def mirror(num_layers: int, num_loops: int) -> list[tuple[int, int]]:
    """Loop 0 runs shared layers 0..K-1, loop 1 runs them back K-1..0, and so on."""
    k = num_layers // num_loops
    return [((l % k) if (l // k) % 2 == 0 else k - 1 - l % k, l // k) for l in range(num_layers)]


@pytest.fixture
def throwaway_entries():
    INIT_STRATEGIES.register("upper", upper)
    KD_LOSSES.register("tvd", total_variation)
    SHARING_MODES.register("mirror", SharingMode(mirror, help="mirror: loop forth and back |1-4 2-3|"))
    ARCHITECTURES.register("qwen3", ArchSpec(kv_projections=None))  # q/k norms: keys are not rotary(k_proj(x))
    try:
        yield
    finally:
        INIT_STRATEGIES.unregister("upper")
        KD_LOSSES.unregister("tvd")
        SHARING_MODES.unregister("mirror")
        ARCHITECTURES.unregister("qwen3")


def test_configs_and_messages_see_the_new_entries(throwaway_entries, capsys):
    assert tied_layers(4, 2, "mirror") == [[0, 3], [1, 2]]
    ConvertSpec(loops=2, sharing="mirror", init="upper")
    ModelConfig(sharing="mirror", init="upper")
    KDConfig(loss="tvd")
    for make, pattern in [
        (lambda: ConvertSpec(loops=2, init="nope"), "allowed: stepwise, average, lower, upper"),
        (lambda: ConvertSpec(loops=2, sharing="nope"), "allowed: cycle, sequence, middle_cycle, mirror"),
        (lambda: ModelConfig(init="nope"), "is not one of stepwise, average, lower, upper"),
        (lambda: ModelConfig(sharing="nope"), "is not one of cycle, sequence, middle_cycle, mirror"),
        (lambda: KDConfig(loss="nope"), "is not one of forward_kl, reverse_kl, jsd, tvd"),
        (lambda: ARCHITECTURES.get("nope"), "unknown architecture 'nope'; allowed: .*qwen3"),
        (lambda: check_supported(T5Config()), r"unsupported architecture 't5'.*tested: .*gpt_neox, qwen3\)"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            make()
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "mirror" in help_text and "upper" in help_text and "{cycle,sequence,middle_cycle,mirror}" in help_text
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    assert kd_divergence(s, t, torch.zeros(2, 3, dtype=torch.long), kind="tvd") > 0


def test_the_converter_model_and_runner_use_the_new_entries(throwaway_entries, tmp_path):
    from rrt_ray.serve.runner import ModelRunner

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=211, hidden_size=48, intermediate_size=80, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=12)  # fmt: skip
    original = AutoModelForCausalLM.from_config(config).eval()
    original.save_pretrained(tmp_path / "src")
    spec = ConvertSpec(loops=2, sharing="mirror", init="upper", lora_rank="full")
    convert_checkpoint(str(tmp_path / "src"), str(tmp_path / "out"), spec, progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert model.config.sharing == "mirror" and model.config.init_strategy == "upper"
    tokens = torch.randint(0, 211, (2, 9))
    with torch.no_grad():
        assert (model(tokens).logits - original(tokens).logits).abs().max() < 1e-4  # exact at full rank
    assert ModelRunner(model).arch is ARCHITECTURES.get("qwen3")
