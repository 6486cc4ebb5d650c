"""Commands that ship a trained run to where models run: export (GGUF, Ollama, vLLM).

Registered on the app in cli/app.py; each imports what it needs when it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from finetune.cli.common import DebugOpt, env_defaults, guarded


def export(
    run: Annotated[str, typer.Argument(help="A finished run directory (LoRA or full), or a model directory.")],
    to: Annotated[str, typer.Option("--to", help="gguf: one .gguf file (llama.cpp, LM Studio); ollama: a folder "
                                                 "with the GGUF and a Modelfile; vllm (or hf): a merged model "
                                                 "folder, or the adapter with --adapter.")] = "gguf",
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="The .gguf file or the folder to write "
                                                                         "(default: beside the run, e.g. "
                                                                         "runs/NAME.q8_0.gguf, runs/NAME-ollama).")] = None,
    quant: Annotated[Optional[str], typer.Option("--quant", "-q", help="GGUF type: f32, f16, bf16, q8_0 (default), "
                                                                       "q4_0, q4_1, q5_0, q5_1; k-quants (q4_k_m, "
                                                                       "q5_k_m, q6_k, ...) need llama-cpp-python.")] = None,
    adapter: Annotated[bool, typer.Option("--adapter", help="vllm: keep the LoRA adapter apart (served on its base "
                                                            "with --enable-lora) instead of merging it.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Export a run for llama.cpp, Ollama or vLLM, offline (a LoRA adapter is merged first).

    Example: finetune export runs/sft --to gguf --quant q8_0 -o sft.gguf
             finetune export runs/sft --to ollama
             finetune export runs/sft --to vllm
    """

    def body():
        env_defaults()
        from finetune.use.export import export as run_export

        result = run_export(Path(run), to, Path(output) if output else None, quant, adapter, overwrite)
        what = result["target"] + (f" {result['quant']}" if result["quant"] else "")
        typer.echo(f"wrote {result['path']} ({what}, {result['bytes'] / 1e6:.1f} MB) in {result['seconds']:.1f} s")
        for note in result["notes"]:
            typer.echo(f"note: {note}")
        for command in result["commands"]:
            typer.echo(f"next: {command}")

    guarded(debug, body)
