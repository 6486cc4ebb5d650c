"""`python -m finetune ...`, so that `accelerate launch -m finetune lora ...` works."""

from finetune.cli.app import main

if __name__ == "__main__":
    main()
