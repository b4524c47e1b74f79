from apex_orch.cli import main

main()
