"""steadygrad's callback in a Hugging Face Trainer run: python examples/hf_trainer.py
(pip install "steadygrad[transformers]"). A 2-layer GPT-2 built from its config, trained on random tokens."""

import torch
import transformers

from steadygrad.integrations.transformers import SteadygradCallback


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=128, length=32, vocab=128):
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


if __name__ == "__main__":
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(
        output_dir="runs/hf",
        max_steps=20,
        per_device_train_batch_size=8,
        logging_steps=5,
        report_to=["tensorboard"],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    callback = SteadygradCallback(every=5)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback])
    trainer.train()
    logged = [e["step"] for e in trainer.state.log_history if "steadygrad/loss" in e]
    print(f"steadygrad records in log_history at steps {logged}; findings: {[f.kind for f in callback.findings]}")
