"""llm_attr: which training examples made my fine-tuned model do this?"""

__version__ = "0.1.0"
