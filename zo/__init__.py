"""zo: fine-tune language models with forward passes only (zeroth-order optimization).

Kept light on purpose: importing ``zo`` loads neither torch nor transformers. Import the
parts you need: ``zo.engine``, ``zo.models``, ``zo.train``, ``zo.config``.
"""

__version__ = "0.1.0"
