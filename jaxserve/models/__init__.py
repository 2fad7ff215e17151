"""Model families, looked up by the model_type of a Hugging Face config.json."""

from jaxserve.models.llama import LlamaForCausalLM

MODEL_CLASSES = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "mixtral": LlamaForCausalLM,
}
