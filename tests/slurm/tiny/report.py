import json
import os
import sys

out, dirs = sys.argv[1], sys.argv[2:]
shards = [json.load(open(os.path.join(d, "shard.json"))) for d in dirs]
json.dump({"shards": shards}, open(out, "w"), indent=1)
