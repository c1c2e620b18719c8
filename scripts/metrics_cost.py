"""What the DPO step's chosen-token statistics (entropy, token accuracy) cost, by XLA's own analysis.

Compiles the policy's loss and gradient on SmolLM2-135M's shapes (nothing is allocated: the params are
shapes only) with and without the statistics and prints FLOPs, transcendentals and temporary memory:

    python scripts/metrics_cost.py --pairs 2 --seq-len 512 [--logits-chunk 128]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from mtjax import train
from mtjax.models import CausalLM, ModelConfig

SMOLLM2_135M = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                           num_kv_heads=3, head_dim=64, max_position_embeddings=2048, tie_word_embeddings=True)


def compiled_cost(pairs: int, seq_len: int, logits_chunk: int | None, token_stats: bool) -> dict[str, float]:
    model = CausalLM(SMOLLM2_135M)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"])
    ids = jax.ShapeDtypeStruct((pairs, seq_len), jnp.int32)
    batch = {f"{side}_{key}": ids for side in ("chosen", "rejected")
             for key in ("input_ids", "attention_mask", "loss_mask")}

    def loss_and_grad(params, batch):
        def loss(params):
            chosen, rejected, _, stats = train._pair_forward(model, params, batch, False, logits_chunk, token_stats)
            return jnp.sum(chosen - rejected), stats
        return jax.grad(loss, has_aux=True)(params)

    compiled = jax.jit(loss_and_grad).lower(params, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # older jax returns one dict per device
    return {"flops": cost["flops"], "transcendentals": cost.get("transcendentals", 0.0),
            "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--logits-chunk", type=int, default=None)
    args = parser.parse_args()
    rows = {stats: compiled_cost(args.pairs, args.seq_len, args.logits_chunk, stats) for stats in (False, True)}
    print(f"{jax.devices()[0].platform}: {args.pairs} pairs x {args.seq_len} tokens, logits_chunk={args.logits_chunk}")
    print(f"{'token stats':<12}{'FLOPs':>14}{'transcendentals':>18}{'temp MiB':>11}")
    for stats, row in rows.items():
        name = "on" if stats else "off"
        print(f"{name:<12}{row['flops']:>14.4e}{row['transcendentals']:>18.4e}{row['temp_mib']:>11.1f}")
    off, on = rows[False], rows[True]
    flops, transcendentals = on["flops"] / off["flops"] - 1, on["transcendentals"] / off["transcendentals"] - 1
    print(f"{'change':<12}{flops:>+14.2%}{transcendentals:>+18.2%}{on['temp_mib'] - off['temp_mib']:>+11.1f}")

if __name__ == "__main__":
    main()
