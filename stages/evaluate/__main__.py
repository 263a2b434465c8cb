from stages.evaluate.stage import main

main()
