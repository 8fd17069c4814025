"""Assets, asset checks, partitions and the OpenAI line schemas of vbs."""
