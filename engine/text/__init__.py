"""The text side the server uses: the tokenizer frontend, chat templates, the output
parser (reasoning, tool calls), grammars, and streaming text. Imports no MLX."""
