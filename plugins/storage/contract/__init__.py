"""The storage plugin's service as other plugins see it, a leaf: ``adapters`` (LoRA adapters)
and ``datasets`` (training datasets), each with its wire models, errors, method table and typed
clients, and ``wire`` for what both share. Importing it pulls in no torch, safetensors or boto3:
it imports only the contract kit (``atoll.agent.contract``), ``atoll.agent.errors``, the
transfer module (``atoll.agent.transfer``) and pydantic. Import from the submodules."""
