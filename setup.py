from setuptools import find_packages, setup

setup(
    name="mindspeed_llm",
    version="0.1.0",
    description="Megatron-style instruction fine-tuning on megatron-core: CUDA, Ascend NPU and CPU.",
    python_requires=">=3.10",
    packages=find_packages(include=["mindspeed_llm", "mindspeed_llm.*"]),
    include_package_data=True,
    install_requires=[
        "megatron-core>=0.16.0,<0.17",
        "torch>=2.4",
        "transformers>=4.51,<6",
        "tokenizers>=0.21",
        "datasets>=3.0",
        "pyarrow>=15",
        "safetensors>=0.4",
        "numpy>=1.26",
        "tqdm>=4.60",
    ],
    extras_require={
        "test": ["pytest>=8", "peft>=0.15"],   # peft: the independent LoRA reference in tests
        "npu": ["torch_npu"],
    },
)
