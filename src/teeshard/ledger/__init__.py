"""Token ledger and contribution pool: SQL (default) and EVM backends behind one protocol."""
