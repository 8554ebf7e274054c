"""What every other package leans on and nothing of its own: several processes (distributed), the Hub's reachability
(hub_access), and how a script starts and ends (script)."""
