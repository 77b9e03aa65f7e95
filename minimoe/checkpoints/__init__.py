"""Published checkpoints: reading and writing the Hugging Face hub layout.

A model repository on the Hugging Face hub is a folder:

    config.json                          the architecture (``ModelConfig.from_hf`` maps it)
    model.safetensors                    all tensors, when they fit in one file, or
    model-00001-of-000NN.safetensors     shards of at most a few GB each, plus
    model.safetensors.index.json         {"weight_map": {tensor name: shard file name}}

The modules, from the bottom up (each imports only those above it in this list):

    shards     safetensors folders: the weight map, one tensor at a time, FP8 blocks
    family     what a checkpoint family is: one name table for both directions, RoPE rule
    deepseek, gqa, longcat, ling    the families (config mapping, names, RoPE, MTP names)
    families   every family by model_type
    hub        downloads of only the shards a layer subset needs
    load       load_pretrained            export    save_pretrained, FP8 -> bf16
    offload    routed experts kept on disk behind an LRU cache
    tokenizer  tokenizer.json and chat templates
    cli        the generate, chat and convert commands

``minimoe.load_pretrained`` and ``minimoe.save_pretrained`` are the entry points.
"""
