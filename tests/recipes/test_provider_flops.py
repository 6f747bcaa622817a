"""Bridge's own TFLOPS log uses the provider's FLOP count, which leaves out frozen weights' wgrad."""


def test_bridge_counts_flops_through_the_provider():
    from flexolmo_plugin.compat import enable_bridge_compat

    enable_bridge_compat()
    from megatron.bridge.training.utils.flop_utils import num_floating_point_operations

    from flexolmo_plugin.recipes.flops import Trainable, step_flops
    from flexolmo_plugin.recipes.phases import flexolmo_public_config
    from flexolmo_plugin.recipes.provider import FlexOlmoModelProvider

    container = flexolmo_public_config(save_dir=None, num_layers=2, hidden_size=64, ffn_hidden_size=96,
                                       num_attention_heads=4, num_key_value_heads=4, vocab_size=300, seq_length=32,
                                       cpu=True)
    dense = container.model.to_flexolmo_config()
    expected = step_flops(dense, seq_length=32, global_batch_size=4, trainable=Trainable.policy("all", 1)).total
    assert num_floating_point_operations(container, batch_size=4) == expected

    two = dense.replace(num_experts=2, top_k=2, expert_names=("public", "owner"))
    counts = {}
    for policy in ("all", "anchored"):
        container.model = FlexOlmoModelProvider.from_flexolmo_config(two, trainable=policy, seq_length=32)
        counts[policy] = num_floating_point_operations(container, batch_size=4)
    # anchored: no wgrad for embeddings, attention, output layer and the public expert
    assert counts["anchored"] < counts["all"]
    assert counts["all"] - counts["anchored"] == (
        step_flops(two, seq_length=32, global_batch_size=4, trainable=Trainable.policy("all", 2)).wgrad
        - step_flops(two, seq_length=32, global_batch_size=4, trainable=Trainable.policy("anchored", 2)).wgrad
        + step_flops(two, seq_length=32, global_batch_size=4, trainable=Trainable.policy("all", 2)).dgrad
        - step_flops(two, seq_length=32, global_batch_size=4, trainable=Trainable.policy("anchored", 2)).dgrad)
