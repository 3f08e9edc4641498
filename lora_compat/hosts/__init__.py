"""What lora_compat gives the hosts: their module names, files converted for them, and the install of the host folders."""
