"""`python tools/convert_ckpt.py {consolidate,to-openclip,from-openclip,to-timm,inspect} ...`"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from ..config import ConfigError

TOP_EXAMPLES = """\
examples:
  python tools/convert_ckpt.py consolidate runs/flip_l16/step_00010000 --out exports/l16
  python tools/convert_ckpt.py to-openclip exports/l16 --out exports/l16_openclip
  python tools/convert_ckpt.py from-openclip weights.safetensors --config open_clip_config.json --out exports/from_oc
  python tools/convert_ckpt.py to-timm exports/l16 --out exports/l16_timm
  python tools/convert_ckpt.py inspect runs/flip_l16/step_00010000

run `python tools/convert_ckpt.py COMMAND --help` for each command's options.
"""

CONSOLIDATE_EXAMPLES = """\
examples:
  python tools/convert_ckpt.py consolidate runs/flip_l16/step_00010000 --out exports/l16
  python tools/convert_ckpt.py consolidate runs/flip_l16 --out exports/l16_bf16 --dtype bf16   # the run's latest

Writes DIR/model.safetensors (model weights only, full tensors, no optimizer state) and
DIR/flip_config.yaml (the resolved config). Tensors are read from the sharded checkpoint a few at a
time and appended to the file as they come: memory stays near the largest tensor. The checkpoint
may have been written by any layout (FSDP, tensor or pipeline parallel, any world size), or by
parallel.engine=deepspeed (ZeRO-1/2/3: the fp32 master weights are assembled from the rank files;
reading them needs `pip install deepspeed`). A DeepSpeed checkpoint of another trainer (no
trainer_state.json / config.yaml) is refused.
"""

TO_OPENCLIP_EXAMPLES = """\
examples:
  python tools/convert_ckpt.py to-openclip exports/l16 --out exports/l16_openclip
  python tools/convert_ckpt.py to-openclip exports/l16 --out exports/l16_openclip --format bin

then, in Python:
  model = open_clip.create_model('local-dir:exports/l16_openclip')

Writes DIR/open_clip_model.safetensors (or open_clip_pytorch_model.bin) and DIR/open_clip_config.json
({"model_cfg": ..., "preprocess_cfg": ...}, the format open_clip's local-dir: and hf-hub: loaders read).
Refused, naming the option: model.text_pad_mask=true, model.vision_pool=avg_all, and
model.text_causal=true with model.text_pool=auto unless --text-eos-pool. Text must be tokenised with the model's data.tokenizer (the note in the
config says which: open_clip's BPE for data.tokenizer=openclip, else flip_scale's sentencepiece model).
"""

FROM_OPENCLIP_EXAMPLES = """\
examples:
  python tools/convert_ckpt.py from-openclip exports/l16_openclip/open_clip_model.safetensors \\
      --config exports/l16_openclip/open_clip_config.json --out exports/l16_back
  python tools/convert_ckpt.py from-openclip epoch_32.pt --config ViT-B-16-sincos.json --out init/b16 --mask-ratio 0.5
  python tools/convert_ckpt.py from-openclip open_clip_model.safetensors --openclip-model ViT-H-14 --out init/h14

Writes a consolidated directory (model.safetensors + flip_config.yaml) to start training from
(`--init-from DIR`). The config may be a bare model config (embed_dim, vision_cfg, text_cfg) or an
open_clip_config.json with model_cfg. .pt/.bin files are loaded with weights_only=True (a file
holding arbitrary Python objects is refused); .safetensors is preferred. --openclip-model NAME reads
the config of a model the installed open_clip knows. The standard ViT CLIP family (ViT-B/L/H/g/bigG,
-quickgelu: learned positions, ln_pre, CLS pooling, argmax text pooling) maps exactly; what
flip_scale cannot represent (layer scale, attentional pooling, custom blocks, timm / HF / custom
text towers (SigLIP), CoCa, ...) is refused, naming the option. The output records where the
weights come from and the mask ratio they were trained with (0 for OpenCLIP's, unless patch_dropout),
which tools/unmask_tune.py reads.
"""

TO_TIMM_EXAMPLES = """\
examples:
  python tools/convert_ckpt.py to-timm exports/l16 --out exports/l16_timm
  python tools/convert_ckpt.py to-timm exports/l16 --out exports/l16_timm_backbone --no-head

then, in Python:
  model = timm.create_model('local-dir:exports/l16_timm', pretrained=True)
  # or: cfg = json.load(open('exports/l16_timm/config.json'))
  #     model = timm.create_model('vit_base_patch16_224', pretrained=False, **cfg['model_args'])

Writes DIR/model.safetensors (a timm VisionTransformer state dict: the image tower only) and
DIR/config.json (architecture, model_args, pretrained_cfg: what timm's local-dir: loader reads).
model(x) is the image embedding (the projection is the bias-free head, num_classes = embed dim);
with --no-head num_classes=0, model(x) is the pooled features and the projection goes to
DIR/projection.safetensors. Pooling: avg_patches -> global_pool avg (fc_norm false: the final
LayerNorm before the pool, as ours), cls -> token. Refused, naming the option: model.vision_pool=avg_all,
model.norm_eps other than 1e-6, options not mapped to timm yet. Needs no timm to write; timm >= 1.0 to load.
"""

INSPECT_EXAMPLES = """\
examples:
  python tools/convert_ckpt.py inspect runs/flip_l16/step_00010000
  python tools/convert_ckpt.py inspect runs/flip_l16            # the run's latest checkpoint
  python tools/convert_ckpt.py inspect exports/l16 --json

Prints the step, a config summary (model, sizes, mask ratio), the parameter count, the layout the
checkpoint was written with (for a DeepSpeed one: its ZeRO stage, data-parallel size and files),
and every model tensor (name, shape, dtype). Reads metadata only.
"""


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="convert_ckpt", formatter_class=fmt, epilog=TOP_EXAMPLES,
        description="Convert flip_scale checkpoints: training (DCP or DeepSpeed) -> consolidated safetensors; "
                    "consolidated <-> OpenCLIP; image tower -> timm; inspect any of them.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("consolidate", help="training checkpoint -> model.safetensors + flip_config.yaml",
                       description="A training checkpoint (DCP or DeepSpeed step directory) -> one consolidated "
                                   "safetensors file + config.",
                       epilog=CONSOLIDATE_EXAMPLES, formatter_class=fmt)
    p.add_argument("checkpoint", metavar="CKPT_DIR", help="step_XXXXXXXX/ directory, or a run directory (its latest)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="dtype of the floating tensors (default fp32)")
    p.add_argument("--group-mib", type=int, default=64,
                   help="MiB of tensors read per DCP load call; DeepSpeed: MiB read between releases of the "
                        "memory-mapped rank files (default 64)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("to-openclip", help="consolidated -> OpenCLIP state dict + open_clip_config.json",
                       description="A consolidated directory -> OpenCLIP weights + model config.",
                       epilog=TO_OPENCLIP_EXAMPLES, formatter_class=fmt)
    p.add_argument("consolidated", metavar="CONSOLIDATED_DIR")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--format", default="safetensors", choices=["safetensors", "bin"], help="weights file format")
    p.add_argument("--text-eos-pool", action="store_true",
                   help="export causal text with OpenCLIP pool_type eos (exact for flip_scale tokenizer output only)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("from-openclip", help="OpenCLIP state dict + config -> consolidated flip_scale checkpoint",
                       description="OpenCLIP weights + model config -> a flip_scale consolidated directory.",
                       epilog=FROM_OPENCLIP_EXAMPLES, formatter_class=fmt)
    p.add_argument("state", metavar="OPENCLIP_STATE", help=".safetensors (preferred), .bin or .pt")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", metavar="OPENCLIP_JSON", help="model config JSON (or open_clip_config.json)")
    source.add_argument("--openclip-model", metavar="NAME",
                        help="a model name the installed open_clip knows (ViT-H-14, ViT-bigG-14, ...): its config")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--mask-ratio", type=float, default=None,
                   help="model.mask_ratio to write (default: the config's, else patch_dropout if > 0, else 0.5)")
    p.add_argument("--dtype", default="keep", choices=["keep", "fp32", "bf16"])
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("to-timm", help="consolidated -> timm VisionTransformer (image tower) + config.json",
                       description="The image tower of a consolidated directory -> timm weights + config.",
                       epilog=TO_TIMM_EXAMPLES, formatter_class=fmt)
    p.add_argument("consolidated", metavar="CONSOLIDATED_DIR")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--no-head", action="store_true",
                   help="num_classes=0 (pooled features out); the projection is written to projection.safetensors")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("inspect", help="print step, config, parameter count, layout and tensors",
                       description="Describe a training checkpoint or a consolidated directory.",
                       epilog=INSPECT_EXAMPLES, formatter_class=fmt)
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--json", action="store_true")
    return parser


def _print(report: dict, as_json: bool, lines: list) -> None:
    print(json.dumps(report, indent=1, default=str) if as_json else "\n".join(lines))


def main(argv: Optional[list] = None) -> int:
    from .checkpoints import consolidate, format_inspect, inspect_checkpoint
    from .openclip import from_openclip, to_openclip
    from .timm import to_timm
    from ..checkpoint.errors import CheckpointError
    from ..checkpoint.safety import ConvertError

    args = _parser().parse_args(argv)
    try:
        if args.command == "consolidate":
            r = consolidate(args.checkpoint, args.out, dtype=args.dtype, group_bytes=args.group_mib * 1024 * 1024)
            _print(r, args.json, [
                f"consolidated step {r['step']}: {r['tensors']} tensors, {r['params']:,} parameters ({r['dtype']})",
                f"wrote {r['out']}/model.safetensors ({r['file_bytes'] / 2**20:.1f} MiB) and {r['out']}/flip_config.yaml",
                f"peak RSS {r['peak_rss_mib']:.0f} MiB ({r['rss_before_mib']:.0f} MiB before the tensors were read: "
                f"+{r['peak_rss_mib'] - r['rss_before_mib']:.0f} MiB while streaming; largest tensor "
                f"{r['largest_tensor_bytes'] / 2**20:.1f} MiB, model {r['file_bytes'] / 2**20:.1f} MiB)",
            ])
        elif args.command == "to-openclip":
            r = to_openclip(args.consolidated, args.out, text_eos_pool=args.text_eos_pool, fmt=args.format)
            _print(r, args.json, [
                f"wrote {r['weights']} ({r['tensors']} tensors) and {r['config']}",
                f"load with: open_clip.create_model('local-dir:{r['out']}')",
                f"note: {r['note']}",
            ])
        elif args.command == "from-openclip":
            r = from_openclip(args.state, args.config, args.out, mask_ratio=args.mask_ratio, dtype=args.dtype,
                              openclip_model=args.openclip_model)
            _print(r, args.json, [
                f"wrote {r['out']}/model.safetensors ({r['tensors']} tensors, {r['params']:,} parameters) "
                f"and {r['out']}/flip_config.yaml (model.name {r['model']['name']}, mask_ratio {r['model']['mask_ratio']})",
                f"source: {r['provenance']}, pre-trained at mask ratio {r['pretraining_mask_ratio']:g}",
            ])
        elif args.command == "to-timm":
            r = to_timm(args.consolidated, args.out, head=not args.no_head)
            _print(r, args.json, [
                f"wrote {r['weights']} ({r['tensors']} tensors) and {r['config']}"
                + (f" and {r['projection']}" if r["projection"] else ""),
                f"load with: timm.create_model('local-dir:{r['out']}', pretrained=True)",
            ])
        else:
            info = inspect_checkpoint(args.checkpoint)
            _print(info, args.json, [format_inspect(info)])
    except (ConvertError, CheckpointError, ConfigError, FileNotFoundError) as error:
        print(f"convert_ckpt {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0
