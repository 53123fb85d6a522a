"""The embedded demo: a tiny DeCLIP ViT on the generated shapes corpus, ~4 minutes on 2 CPU cores.

    python tools/prepare.py make-demo             # once: data/demo (10k train / 2k val pairs)
    python train.py --config configs/demo.py --workdir runs/demo
    python train.py --config configs/demo.py:clip --workdir runs/demo_clip   # CLIP-baseline twin
    python tools/compare_demo.py                  # both, 3 seeds, equal steps and time, views swapped

The zero-shot classes are the 10 shapes of the corpus ('circle', 'star', ...), each image a grid of
copies of one in any colour: the class survives DeCLIP's crops, flips and colour ops, colour alone
scores at chance (10 % top-1), so the number says how much shape a model has learned.
"""
from configs import common


def get_config(arg=None):
    """`clip`: the CLIP-baseline twin (same data, budget and encoders); `smoke`: a few steps."""
    declip = arg != 'clip'
    c = common.on_demo_data(common.tiny(common.base_config(common.ViT_B32, declip=declip)))
    c.max_iter = 600
    c.data.update(dict(batch_size=64, workers=1, prefetch=4))
    c.optim.update(dict(warmup_steps=100))
    c.log_every, c.ckpt_every, c.keep_every, c.eval_every = 25, 200, 600, 300
    c.eval.prompts = 'prompt6'
    return common.apply_arg(c, None if arg in (None, 'clip') else arg)
