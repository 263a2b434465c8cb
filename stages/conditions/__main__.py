from stages.conditions.stage import main

main()
