import {getLlama} from "node-llama-cpp";
const [modelPath, loraPath, ...prompts] = process.argv.slice(2);
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath});
const result = {};
for (const which of ["base", "lora"]) {
  const opts = {contextSize: 128, threads: 1};
  if (which === "lora") opts.lora = {adapters: [{filePath: loraPath, scale: 1}]};
  const context = await model.createContext(opts);
  result[which] = [];
  for (const prompt of prompts) {
    const seq = context.getSequence();
    const toks = model.tokenize(prompt, true);
    let probs;
    for await (const out of seq.evaluateWithMetadata(toks, {probabilities: true}, {temperature: 1, topK: 0, topP: 1})) { probs = out.probabilities; break; }
    const top = [...probs.entries()].sort((a, b) => b[1] - a[1]).slice(0, 10);
    result[which].push({prompt_tokens: Array.from(toks), size: probs.size, top});
    seq.dispose();
  }
  await context.dispose();
}
console.log(JSON.stringify(result));
process.exit(0);
