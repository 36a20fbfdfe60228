"""Code generated from protos/fed_dfkd/proto/v1 by scripts/gen_protos.sh. Do not edit."""
