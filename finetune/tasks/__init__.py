"""One module per task. Each opens with the command that runs it and has `run(recipe, resume)`,
going top to bottom: tokenizer -> data -> model -> LoRA -> Trainer -> train -> evaluate -> save.

Optional functions a task may define, used by the CLI:
    check(recipe) -> (problems, notes)   `finetune validate`: data checks before training
    load_trained(run_dir)                 the trained model (a PeftModel for LoRA runs), for merge
"""
