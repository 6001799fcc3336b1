nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.used,compute_cap --format=csv,noheader,nounits
