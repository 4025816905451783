from slurmserve.launcher.cli import main

main()
